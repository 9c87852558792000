"""Demo and bench rigs, apart from the product: small generated models, the hil bench, the image demo.

``appliance demo`` and the tests, hil/ and bench/ use them; nothing in the image pipeline,
the registry or the fleet tools does.
"""
