"""cmkd_scale: cross-model knowledge distillation for audio at AudioSet scale."""
