"""The model as it ships next to every checkpoint: `save_pretrained` copies these modules beside the weights, so
`trust_remote_code=True` loads them without this package. They import nothing outside this folder."""
