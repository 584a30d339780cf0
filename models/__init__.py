"""Network definitions in plain torch and the model zoo (backbone name -> constructor, weights, preprocessing)."""
