"""Client-side encryption: age keys (:mod:`.keys`) and the age file format (:mod:`.age`)."""
