"""`vd ui`: a local web page over the workspaces under one ROOT folder (Gradio, the optional extra `vd[ui]`).

The page is one more client of the stage entry points the CLI calls (stages.mask, stages.invert,
stages.edit, stages.evaluate, stages.export) and of the same workspace folders; it keeps no second copy of
any stage. Modules:
  paths    ROOT confinement, clip and workspace listing, uploads
  objects  the page's named objects (points, boxes, phrases) and their `vd mask` options
  jobs     one long job at a time, its progress, and the Stop button (the stages' own interruption)
  actions  Studio: every action of the page, and the equivalent `vd` command line of each
  page     the Gradio page and its named API endpoints (gradio imported only there)
  server   the security checks and the launch
"""
