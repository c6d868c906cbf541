import pytest

import moe_py


@pytest.fixture(autouse=True)
def _restore_threads():
    n = moe_py.get_num_threads()
    yield
    moe_py.set_num_threads(n)
