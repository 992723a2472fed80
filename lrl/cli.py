def main():
    print("lrl: LightningRL CLI (coming)")
