"""Pictures from numbers: training curves and the report figures. No computing here, only drawing."""
import matplotlib

matplotlib.use("Agg")  # files only, never a window: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_history(history, path, best_epoch=None):
    """history: list of dicts with epoch, train_loss, val_loss, train_acc, val_acc, lr -> a PNG at path."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set(title=title, xlabel="epoch", ylabel=title.lower())
    axes[2].plot(epochs, [h["lr"] for h in history], "o-", color="tab:green")
    axes[2].set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="learning rate")
    for ax in axes:
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
