"""Pictures: figure setup (`figures`), a run's pictures (`run_pictures`), a sweep's plots
(`sweep_plots`)."""
