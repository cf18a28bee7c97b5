"""Local circuits: the linear replacement model of one prompt, direct and hierarchical attribution,
OV and QK edges through attention heads."""
