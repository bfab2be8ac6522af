"""The metric: protected. val_bpb is a fixed function of the configuration (lower is better)."""


def evaluate_bpb(cfg, data) -> float:
    assert len(data) == 1_000
    return 1.0 + (cfg.DEPTH - 6) ** 2 * 0.01 + 6.4 / cfg.WIDTH
