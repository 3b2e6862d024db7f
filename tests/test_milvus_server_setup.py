"""Where the Milvus server cannot run (not installed, no network namespaces), its tests are skipped saying why,
except in CI (``CI=true``), where they fail."""

import errno
import os

import pytest

import milvus_server
from conftest import missing


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_server_is_a_skip_with_instructions_or_a_failure_in_ci(monkeypatch, tmp_path, ci):
    monkeypatch.setattr(milvus_server, "SERVER", milvus_server.VENV / "bin" / "no-such-milvus-server")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(milvus_server.ServerUnavailable) as unavailable:
        milvus_server.address(tmp_path)
    assert "install it with `make milvus-server`" in str(unavailable.value)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match=r"no Milvus server at \.venv-milvus/bin/no-such-milvus-server"):
        missing(str(unavailable.value))


def test_without_network_namespaces_the_relay_says_why_and_starts_nothing(monkeypatch, tmp_path):
    def refused():
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(milvus_server, "private_network", refused)
    (tmp_path / "owner").write_text(str(os.getpid()))
    (tmp_path / "relay.pid").write_text(str(os.getpid()))  # as if started: address() only reads the state
    assert milvus_server.main(["--folder", str(tmp_path), "--owner", str(os.getpid())]) == 1
    with pytest.raises(milvus_server.ServerUnavailable, match=r"cannot make a private network namespace .*"
                       r"Operation not permitted.*unshare -rn true"):
        milvus_server.address(tmp_path)
    assert not (tmp_path / "data").exists()
