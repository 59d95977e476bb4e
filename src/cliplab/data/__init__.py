"""Data: every dataset, reader, split and few-shot subset.

- :mod:`.images`: safe image decoding and image-file discovery;
- :mod:`.sources`: caption tables (CSV/TSV/JSONL), WebDataset shards, their map-style
  datasets and the record of skipped samples;
- :mod:`.datasets`: classification and retrieval datasets, their readers, ``load_dataset``,
  validation splits and few-shot subsets;
- :mod:`.text`: reading text files;
- :mod:`.records`: the one record of a skipped input and the result of encoding images;
- :mod:`.shapes`: the ShapesWorld generator, its named worlds, tasks and exporters.

The package imports nothing of the rest of cliplab but the core modules (errors, progress; see
``docs/architecture.md``).
"""
