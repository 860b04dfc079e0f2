"""lpconvert's task definitions for lm-evaluation-harness: YAML files and the data loaders they call
(data.py). Point the harness here with `lm_eval --include_path "$(lpconvert tasks --path)"`."""
