"""Shared pytest hooks."""
import sys


def pytest_terminal_summary(terminalreporter):
    """How many argv tests/test_cli_fuzz.py ran per command line, and how they ended."""
    fuzz = sys.modules.get("test_cli_fuzz")
    if fuzz is None or not fuzz.TRIED:
        return
    terminalreporter.section("argv fuzzed per command line")
    for name in fuzz.SPECS:
        ends = {o: n for (s, o), n in sorted(fuzz.TRIED.items()) if s == name}
        if ends:
            terminalreporter.write_line(f"{name}: {sum(ends.values())} argv ("
                                        + ", ".join(f"{o}: {n}" for o, n in ends.items()) + ")")
