"""A long caption shared by the tests of cliplab.generative."""

#: A long ShapesWorld-style caption (about 90 tokens; shapes-tiny reads 32).
LONG = ("A picture of three shapes on a striped background. There are two circles and one star. "
        "By colour: two red and one blue. The first shape is a large red circle at the top left. "
        "The second shape is a small red circle at the bottom. The third shape is a large blue star "
        "on the right. The red circle at the bottom is below the red circle at the top left. "
        "There are no defects.")
