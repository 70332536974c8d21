from pixelfly_lab.cli import main

raise SystemExit(main())
