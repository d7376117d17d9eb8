"""Built-in placement rules (data files), resolved by bare name: `--rules deepseek-v3.yaml`."""
