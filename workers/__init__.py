"""Ray UDF classes and the model code they drive (heavy imports live in `workers.modeling`)."""
