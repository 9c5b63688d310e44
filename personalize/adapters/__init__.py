"""Learned artifacts in other tools' layouts: key conversion, safe reading and writing."""
