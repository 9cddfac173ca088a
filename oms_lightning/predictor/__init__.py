"""The OMS-DPM schedule predictor and its data.

    encoding.py  schedules → padded tensors (member per NFE slot, order, λ at both ends of each step)
    network.py   SchedulePredictor: step embeddings → LSTM over the real steps → score (lower = better FID)
    module.py    PredictorModule (pairwise ranking loss, Kendall τ), ScheduleFIDDataModule, fit_predictor
    records.py   RecordStore: the append-only schedule→FID JSON-lines store
    generate.py  schedules → samples → FID records, resumable and distributed (Lightning Fabric)
"""
