"""One thin orchestrator per ``esa`` command: each ``run_<command>`` opens the run directory, calls the library and
writes the files (``baseline``, ``profile``, ``perturb``, ``run``, ``superweights``, ``validate``, ``compare``,
``report``, ``plan``).

Only :mod:`esa.api` and the command line (``esa.cli``) import this package; library modules never do
(tests/test_import_graph.py), so the dependency direction stays library → commands → api → cli.
"""
