"""Looking at a model and its data: module and parameter views (inspection), interpret
(confusion, top losses, Grad-CAM, suspected mislabels, outliers, duplicates, report)."""
