"""Helpers that tests/, hil/ and bench/ share (a test server, generated bundles and registries,
a sealable test root, an appliance under test).  Not part of the product's packages.
"""
