"""The control plane: decides when workers flip between the prefill and decode pools."""
