"""`lab mutants`: mutation testing of the conformance checks against the correct sim drivers.

mutants.py says what is mutated (files, functions in scope, operators) and names each mutant;
probe.py runs the checks on one mutant; runner.py runs them all in parallel and writes the report.
"""
