"""Image archives: embed a folder, files, a dataset or a PACS export with a MedMoE model, index it with FAISS and
search it (the `medmoe-index` and `medmoe-search` commands). Not training: it reads a finished model folder."""
