"""native_stderr.held: what native code writes to descriptor 2 is dropped on request, else shown."""

import os

import pytest

from gqa_t5x import native_stderr


def test_held_drops_only_when_asked(capfd):
    with native_stderr.held() as output:
        os.write(2, b"expected refusal\n")
        output.drop()
    assert capfd.readouterr().err == ""
    with native_stderr.held():
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == "something else\n"
    with pytest.raises(RuntimeError), native_stderr.held() as output:
        os.write(2, b"before the error\n")
        output.drop()
        raise RuntimeError("boom")
    assert capfd.readouterr().err == "before the error\n"  # an error shows what was held
    os.write(2, b"after\n")  # descriptor 2 is the terminal's again
    assert capfd.readouterr().err == "after\n"
