"""Every test with a ``case`` argument runs over kernel_cases.CASES."""

from kernel_cases import CASES


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=str)
