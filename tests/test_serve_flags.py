"""reir serve given a database where an index belongs (or the reverse) names the flag to use."""

from conftest import run_reir


def test_database_as_index_and_index_as_database_name_the_right_flag(served_model, tmp_path):
    database = str(served_model.database)
    refused = run_reir("serve", "--index", database, "--port", "0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "is a database" in refused.stderr and f"--data_base {database}" in refused.stderr

    index = tmp_path / "digits.faiss"
    assert run_reir("index", "--data_base", database, "--output", str(index)).returncode == 0
    refused = run_reir("serve", "--data_base", str(index), "--port", "0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "is an index" in refused.stderr and f"--index {index}" in refused.stderr
