"""The public names the README and the notebooks rely on import from the package, and the import stays light."""

import subprocess
import sys

import pixelfly_lab

CONTRACT = ["butterfly_factor_mask", "flat_butterfly_mask", "flat_block_butterfly_layout", "layout_to_mask",
            "make_pattern", "plan_pixelfly", "PixelflyLinear", "BlockSparseLinear", "LowRankLinear",
            "MaskedLinear", "MonarchLinear", "ButterflyLinear", "sparsify", "empirical_ntk", "kernel_distance",
            "target_matrix", "approximate", "block_sparse_attention", "PixelflyAttention", "materialize"]


def test_contract_names_are_exported():
    missing = [name for name in CONTRACT if not hasattr(pixelfly_lab, name)]
    assert not missing
    assert set(CONTRACT) <= set(pixelfly_lab.__all__)
    assert all(hasattr(pixelfly_lab, name) for name in pixelfly_lab.__all__)


def test_every_layer_has_a_dense_weight():
    for name in ["PixelflyLinear", "BlockSparseLinear", "LowRankLinear", "MaskedLinear", "MonarchLinear",
                 "ButterflyLinear"]:
        assert callable(getattr(getattr(pixelfly_lab, name), "dense_weight", None)), name
        for method in ("project_", "rescale_", "match_", "weight_std", "reset_parameters", "linear_parts"):
            assert callable(getattr(getattr(pixelfly_lab, name), method, None)), (name, method)


def test_import_does_not_load_triton_or_matplotlib():
    code = "import sys, pixelfly_lab; print('triton' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
