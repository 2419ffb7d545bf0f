"""One module per stage of the R1 recipe; each exposes `run(stage) -> metrics`."""
