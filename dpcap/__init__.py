"""dpcap: differentially private representation learning by image captioning (DP-Cap)."""

__version__ = "0.1.0"
