"""Fulcrum: our own vLLM KV connector for role-flippable (``kv_both``) P/D workers.

The role of a worker is decided per request from ``kv_transfer_params``: a request with
``do_remote_decode`` makes this worker the producer (it keeps the prompt's KV blocks under a
lease and returns the parameters the decode leg needs); a request with ``do_remote_prefill``
makes it the consumer (it pulls those blocks before decoding). Transfers are keyed on the
``transfer_id`` we put in ``kv_transfer_params``, never on vLLM's internal request id.

vLLM loads :class:`kv_transfer.fulcrum.connector.FulcrumConnector` through
``kv_connector_module_path = "kv_transfer.fulcrum.connector"``.
"""
