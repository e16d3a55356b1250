"""matplotlib for the experiments: imported only when a figure is drawn, headless."""


def pyplot():
    """`matplotlib.pyplot` on the Agg back end (figures only go to files)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'fedjax_lab[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
