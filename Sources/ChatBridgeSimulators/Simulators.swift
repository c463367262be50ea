import Foundation
import Hummingbird
import HummingbirdCore
import HTTPTypes
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import ServiceLifecycle
import Synchronization

/// A Hummingbird server on loopback, started in the background and stopped with `stop()`.
public final class LoopbackServer: Sendable {
    public let port: Int
    private let task: Task<Void, any Error>
    private let group: ServiceGroup

    private init(port: Int, task: Task<Void, any Error>, group: ServiceGroup) {
        self.port = port
        self.task = task
        self.group = group
    }

    /// Starts `router` on `127.0.0.1:port` (0 picks a free port) and returns once it listens.
    public static func start(
        router: Router<BasicRequestContext>, port: Int = 0, name: String, server: HTTPServerBuilder = .http1()
    ) async throws -> LoopbackServer {
        var logger = Logger(label: "chatbridge.simulator.\(name)")
        logger.logLevel = .warning
        let (stream, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = Application(
            router: router,
            server: server,
            configuration: .init(address: .hostname("127.0.0.1", port: port), serverName: name),
            onServerRunning: { channel in continuation.yield(channel.localAddress?.port ?? 0) },
            logger: logger
        )
        let group = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let task = Task {
            defer { continuation.finish() }
            try await group.run()
        }
        var iterator = stream.makeAsyncIterator()
        guard let bound = await iterator.next() else {
            _ = try await task.value
            throw SimulatorError(description: "\(name) simulator stopped before listening")
        }
        return LoopbackServer(port: bound, task: task, group: group)
    }

    public var baseURL: String { "http://127.0.0.1:\(port)" }

    public func stop() async {
        await group.triggerGracefulShutdown()
        _ = try? await task.value
    }
}

public struct SimulatorError: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

extension Response {
    static func json(_ status: HTTPResponse.Status = .ok, _ object: Any) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
    }
}

/// Where a simulator holds requests: while closed, `pass()` waits until the gate opens.
final class Gate: Sendable {
    private let state: Mutex<(isOpen: Bool, waiting: [CheckedContinuation<Void, Never>])>

    init(open: Bool) { state = Mutex((open, [])) }

    func close() { state.withLock { $0.isOpen = false } }

    func open() {
        let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.isOpen = true
            defer { state.waiting = [] }
            return state.waiting
        }
        for continuation in waiting { continuation.resume() }
    }

    func pass() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLock { state -> Bool in
                guard !state.isOpen else { return true }
                state.waiting.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }
}
