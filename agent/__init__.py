"""The on-device agent of Sovereign Appliance: inference, health and verified updates."""

__version__ = "0.1.0"
