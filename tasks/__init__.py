"""Transfer problems: datasets, feature front-ends and backbones."""
