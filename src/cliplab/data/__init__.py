"""Data: safe image decoding (:mod:`.images`), caption tables and WebDataset shards
(:mod:`.sources`), and the ShapesWorld generator (:mod:`.shapes`)."""
