"""Analysis of teacher vs quantized vs student: attention ranking, sharpness, error propagation, plots.

Pure tensor metrics (no model, no I/O), each defined with its padding rule in its docstring:

* :mod:`.attention_metrics` — ``cover_length_ratio``, ``pairwise_ranking_loss`` (per query row);
* :mod:`.hessian` — ``hessian_vector_product``, ``top_hessian_eigenvalues`` (power iteration + deflation);
* :mod:`.propagation` — ``layerwise_mse`` / ``squared_error_sums`` of per-layer hidden states;
* :mod:`.ranges` — ``token_minmax`` / ``position_range_sums`` of the attention output ``Y_l``;
* :mod:`.decomposition` — ``sa_prop_vectors``, ``sa_gen_distance``, ``sa_prop_distance``.

Around them: :mod:`.compare` (``analyze``: runs the models through the taps, batch by batch, and feeds each
enabled metric), :mod:`.measures` (the metrics over a split, each a compute/write pair in ``METRICS``),
:mod:`.config` (``AnalysisConfig``), :mod:`.result` (``AnalysisResult``), :mod:`.curves` (``log.csv`` →
series, convergence), :mod:`.plots` (matplotlib figures without pyplot), :mod:`.report` (``write_analysis``,
``write_curves``), :mod:`.inputs` (models and data for ``ds-kdqat analyze``), :mod:`.io` (report formats,
written through :mod:`ds_kdqat.fileio`). Submodules are imported on use, so importing this package costs
nothing (the sweep runner uses :mod:`.io` without loading torch).
"""
