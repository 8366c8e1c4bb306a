"""Code the test modules share (no test module imports another).

tests/ is on sys.path through pyproject's `[tool.pytest.ini_options] pythonpath = ["tests"]`, so a
test imports `from helpers.training import run_train`. Fixtures shared by several modules (`tiny`,
`process_group`, `hf_tokenizer`) live in tests/conftest.py instead: pytest finds them there.
"""
