"""Everything that runs on the operator's machine: bundles, registry, images, fleet."""
