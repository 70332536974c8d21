"""Layout pictures keep the matrix's aspect ratio and say when their axes count blocks."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pixelfly_lab.structure.pictures import show_mask, show_masks  # noqa: E402


def test_show_mask_keeps_the_true_aspect_ratio_and_labels_blocks():
    ax = show_mask(torch.ones(128, 32, dtype=torch.bool), block_size=32)
    assert ax.get_aspect() == 1.0                         # a 4:1 layout is drawn 4:1, not stretched
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    assert abs(y0 - y1) / abs(x1 - x0) == pytest.approx(4.0)
    assert "block (of 32)" in ax.get_xlabel() and "block (of 32)" in ax.get_ylabel()
    plain = show_mask(torch.eye(8, dtype=torch.bool))
    assert plain.get_xlabel() == "input (column)" and plain.get_ylabel() == "output (row)"
    fig = show_masks({"a": torch.eye(4, dtype=torch.bool)}, block_size=16)
    assert "of 16" in fig.axes[0].get_xlabel()
    plt.close("all")
    with pytest.raises(ValueError, match="2-D"):
        show_mask(torch.ones(3, dtype=torch.bool))
