"""What a registration is judged by: field regularity (Jacobian, displacement), label overlap and surface distances,
landmark error, image similarity, and the visual report."""
