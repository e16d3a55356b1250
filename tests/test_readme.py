"""The README's Python example runs as written."""

import pathlib
import re


def test_readme_python_example_runs():
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    (example,) = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    state = namespace["state"]
    assert int(state.round) == 10 and int(state.metrics["participants"]) == 10
