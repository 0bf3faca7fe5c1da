"""Models: timm backbones with weight loading, and the LightningModule that trains them."""
