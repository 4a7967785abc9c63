"""Print the recipe reference table (markdown) from the schema: paste it into the README."""

from gemma3_tune.train.recipe import describe_keys

print("| key | default | meaning |")
print("|---|---|---|")
for key, default, doc in describe_keys():
    print(f"| `{key}` | `{default}` | {doc} |")
