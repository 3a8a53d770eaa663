"""Types shared by the gateway (`router`), the control plane (`instance_manager`) and the
simulator (`benchmarks.sim`): workers and their roles, cluster snapshots, SLO targets, what a
routing policy knows about a request, and the feedback a policy receives. Nothing here
imports from those packages, so each can depend on this one without depending on the others.
"""
