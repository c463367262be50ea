import ArgumentParser
import ChatBridgeServer
import ChatBridgeSimulators
print("hi")
