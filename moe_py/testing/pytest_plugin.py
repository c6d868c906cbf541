"""pytest plugin (registered as "moe_py" through the pytest11 entry point): the option
--moe-update-golden and the fixture `moe_golden`.

    def test_my_layer(moe_golden):
        moe_golden("tests/golden/my_layer.npz", layer, {"x": x})

compares the layer's config, weights and every output and gradient on those inputs with the
golden file, or (re)writes it when it is missing or when pytest runs with
--moe-update-golden."""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--moe-update-golden", action="store_true", default=False,
                     help="moe_py: rewrite golden files instead of comparing with them")


@pytest.fixture
def moe_golden(request):
    update = request.config.getoption("--moe-update-golden")

    def check(path, layer, inputs):
        from .golden import assert_matches_golden, save_golden
        if update or not os.path.exists(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_golden(path, layer, inputs)
        else:
            assert_matches_golden(path, layer, inputs)
    return check
