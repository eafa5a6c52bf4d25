"""Cascade's discrete-event simulator: the mesh's own decision code (the scaler's core, the
loader's assignment and planner, the gateway's batcher and router, the worker's admission rule
and step pricing) driven on modelled hosts, links and time, at any scale (docs/simulator.md).

A package beside `services` and `bench`, not inside `cascade`: it imports the services' cores,
and `cascade` is the common package every service imports, so nothing a service loads can pull
the simulator in (tests/test_sim_layering.py checks that no service imports it).
"""
