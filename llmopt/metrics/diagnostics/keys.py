"""The diagnostics' metric keys, written once: the recorder writes them and the readers (llmopt.report,
scripts/plot_runs.py) look them up through these names. T = a tensor id (tensor_id), L = a layer."""

PREFIX = "diag/"
QUANTITIES = ("update_rms", "weight_rms", "grad_rms", "w_over_g", "w_over_m", "dist_init", "dist_init_rel")
TOKEN_QUANTILES = (("q50", 0.5), ("q90", 0.9), ("q99", 0.99))
EFF_LR_QUANTILES = (("q10", 0.1), ("median", 0.5), ("q90", 0.9))

GRAD_NORM = "diag/global/grad_norm"
UPDATE_NORM = "diag/global/update_norm"
WEIGHT_NORM = "diag/global/weight_norm"
DIST_INIT = "diag/global/dist_init"
DIST_INIT_REL = "diag/global/dist_init_rel"
LOSS_SPIKE = "diag/global/loss_spike"
LOSS_SPIKE_RATIO = "diag/global/loss_spike_ratio"
TOKEN_GRAD_NORM_MAX_OVER_MEDIAN = "diag/head/token_grad_norm_max_over_median"
EFF_LR_PREFIX = "diag/adam/eff_lr_"
SGD_LL_PREFIX = "diag/sgd_ll/"
RMS_CLIP_FRACTION_LAYERS = "diag/sgd_ll/rms_clip_fraction_layers"
ROW_CLIP_FRACTION = "diag/sgd_ll/row_clip_fraction"
LOOKAHEAD_BETA = "diag/lookahead/beta"
LOOKAHEAD_MOMENTUM_NORM = "diag/lookahead/momentum_norm"


def per_tensor(tid: str, quantity: str) -> str:
    """diag/T/<quantity>, quantity one of QUANTITIES."""
    return f"diag/{tid}/{quantity}"


def token_grad_norm(name: str) -> str:
    """diag/head/token_grad_norm_<name>, name q50, q90, q99 or max."""
    return f"diag/head/token_grad_norm_{name}"


def eff_lr(name: str, layer: str) -> str:
    """diag/adam/eff_lr_<name>/L, name q10, median or q90."""
    return f"{EFF_LR_PREFIX}{name}/{layer}"


def rms_clip_fraction(role: str) -> str:
    """diag/sgd_ll/rms_clip_fraction/<role>."""
    return f"diag/sgd_ll/rms_clip_fraction/{role}"
