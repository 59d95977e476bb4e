"""Data: safe image decoding (:mod:`.images`), caption tables and WebDataset shards
(:mod:`.sources`), skip records (:mod:`.records`), and the ShapesWorld generator
(:mod:`.shapes`)."""
