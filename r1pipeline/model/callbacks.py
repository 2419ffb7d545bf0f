"""Trainer hook for aux-loss-free balancing: the routing-bias update after every optimizer step."""

from __future__ import annotations

from transformers import TrainerCallback


class RoutingBiasCallback(TrainerCallback):
    """Calls `model.update_routing_bias()` at the end of each optimizer step (V3 §2.1.2: the load is
    counted over the whole step's batch, gradient-accumulation micro-batches included) and logs the
    load imbalance (max/mean) it corrected as `moe_load_imbalance`. Models without the method are left alone."""

    def __init__(self):
        self.imbalance = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        update = getattr(model, "update_routing_bias", None)
        if update is not None:
            self.imbalance = update()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.imbalance is not None:
            logs["moe_load_imbalance"] = round(self.imbalance, 4)
