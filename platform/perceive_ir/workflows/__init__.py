"""Ray jobs composed of the layers below: the evaluation on Ray, promotion through gates, the
``perceive-registry`` command."""
